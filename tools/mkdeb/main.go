// Command mkdeb builds rerouted's Debian package with nfpm, used as a Go
// library: no packaging toolchain beyond Go. It is a module of its own, so
// that neither nfpm nor its dependencies enter rerouted's module (and so
// the daemon's build).
//
//	mkdeb -root REPO -binary BIN -describe "$(git describe --tags --always --dirty)" -out DIR
//
// writes DIR/rerouted_VERSION_amd64.deb and prints its path. The version
// is Debian's form of git describe's (debVersion); file dates come from
// SOURCE_DATE_EPOCH (the Makefile sets the commit's), so that a build is
// reproducible.
package main

import (
	"bytes"
	"compress/gzip"
	"debug/elf"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/goreleaser/nfpm/v2"
	"github.com/goreleaser/nfpm/v2/deb"
	"github.com/goreleaser/nfpm/v2/files"
)

// Options say what to package and where.
type Options struct {
	Root       string    // the repository's top directory
	Binary     string    // the rerouted binary to install as /usr/sbin/rerouted
	Describe   string    // git describe --tags --always --dirty
	Out        string    // directory the .deb is written to
	Maintainer string    // "Name <address>"
	Date       time.Time // the changelog's date and every file's
}

func main() {
	var o Options
	flag.StringVar(&o.Root, "root", ".", "the repository's top directory")
	flag.StringVar(&o.Binary, "binary", "bin/rerouted", "the rerouted binary")
	flag.StringVar(&o.Describe, "describe", "", "the version as git describe --tags --always --dirty prints it")
	flag.StringVar(&o.Out, "out", ".", "directory to write the package to")
	flag.StringVar(&o.Maintainer, "maintainer", "rerouted maintainers <maintainers@rerouted.invalid>", "the Maintainer field")
	flag.Parse()
	o.Date = time.Now().UTC()
	if s := os.Getenv("SOURCE_DATE_EPOCH"); s != "" {
		sec, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			fmt.Fprintf(os.Stderr, "mkdeb: SOURCE_DATE_EPOCH=%q: %v\n", s, err)
			os.Exit(2)
		}
		o.Date = time.Unix(sec, 0).UTC()
	}
	path, err := Build(o)
	if err != nil {
		fmt.Fprintf(os.Stderr, "mkdeb: %v\n", err)
		os.Exit(1)
	}
	fmt.Println(path)
}

// The package's files: where each comes from in the repository, and its mode.
var repoFiles = []struct {
	src, dst string
	mode     os.FileMode
}{
	{"packaging/bash_completion", "/usr/share/bash-completion/completions/rerouted", 0o644},
	{"packaging/copyright", "/usr/share/doc/rerouted/copyright", 0o644},
	{"packaging/lintian-overrides", "/usr/share/lintian/overrides/rerouted", 0o644},
	{"examples/per-user.toml", "/usr/share/doc/rerouted/examples/per-user.toml", 0o644},
	{"examples/per-service.toml", "/usr/share/doc/rerouted/examples/per-service.toml", 0o644},
	{"examples/per-destination.toml", "/usr/share/doc/rerouted/examples/per-destination.toml", 0o644},
	{"examples/per-application.toml", "/usr/share/doc/rerouted/examples/per-application.toml", 0o644},
	{"examples/honor-iptables-marks.toml", "/usr/share/doc/rerouted/examples/honor-iptables-marks.toml", 0o644},
	{"examples/metered-standby.toml", "/usr/share/doc/rerouted/examples/metered-standby.toml", 0o644},
	{"examples/rerouted.toml", "/usr/share/doc/rerouted/examples/rerouted.toml", 0o644},
}

// manPages are gzipped into /usr/share/man/manN.
var manPages = []string{"docs/man/rerouted.8", "docs/man/rerouted.toml.5"}

// Build writes the package and returns its path.
func Build(o Options) (string, error) {
	upstream, err := debVersion(o.Describe)
	if err != nil {
		return "", err
	}
	// Revision 1: the packaging is this repository's, and its changelog
	// is changelog.Debian.gz.
	version := upstream + "-1"
	libc, err := libcDepends(o.Binary)
	if err != nil {
		return "", err
	}
	stage, err := os.MkdirTemp("", "mkdeb")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(stage)
	src := func(p string) string { return filepath.Join(o.Root, p) }

	var contents files.Contents
	add := func(source, dst string, mode os.FileMode, typ string) {
		contents = append(contents, &files.Content{Source: source, Destination: dst, Type: typ,
			FileInfo: &files.ContentFileInfo{Owner: "root", Group: "root", Mode: mode, MTime: o.Date}})
	}
	add(o.Binary, "/usr/sbin/rerouted", 0o755, "")
	// The example unit, with the binary where the package puts it.
	unit, err := os.ReadFile(src("examples/rerouted.service"))
	if err != nil {
		return "", err
	}
	unitPath := filepath.Join(stage, "rerouted.service")
	if err := os.WriteFile(unitPath, []byte(PackagedUnit(string(unit))), 0o644); err != nil {
		return "", err
	}
	add(unitPath, "/usr/lib/systemd/system/rerouted.service", 0o644, "")
	// Root's alone: rerouted refuses a configuration others can change.
	add(src("packaging/rerouted.toml"), "/etc/rerouted/rerouted.toml", 0o600, files.TypeConfig)
	for _, f := range repoFiles {
		add(src(f.src), f.dst, f.mode, "")
	}
	for _, m := range manPages {
		b, err := os.ReadFile(src(m))
		if err != nil {
			return "", err
		}
		gz, err := gzipped(b, o.Date)
		if err != nil {
			return "", err
		}
		name := filepath.Base(m)
		p := filepath.Join(stage, name+".gz")
		if err := os.WriteFile(p, gz, 0o644); err != nil {
			return "", err
		}
		add(p, "/usr/share/man/man"+name[len(name)-1:]+"/"+name+".gz", 0o644, "")
	}
	gz, err := gzipped([]byte(changelog(version, o)), o.Date)
	if err != nil {
		return "", err
	}
	p := filepath.Join(stage, "changelog.Debian.gz")
	if err := os.WriteFile(p, gz, 0o644); err != nil {
		return "", err
	}
	add(p, "/usr/share/doc/rerouted/changelog.Debian.gz", 0o644, "")
	for _, d := range []string{"/etc/rerouted"} {
		contents = append(contents, &files.Content{Destination: d, Type: files.TypeDir,
			FileInfo: &files.ContentFileInfo{Owner: "root", Group: "root", Mode: 0o755, MTime: o.Date}})
	}

	info := &nfpm.Info{
		Name:          "rerouted",
		Arch:          "amd64",
		Platform:      "linux",
		Version:       version,
		VersionSchema: "none",
		Section:       "net",
		Priority:      "optional",
		Maintainer:    o.Maintainer,
		Homepage:      "https://github.com/rerouted/rerouted",
		Description: "source address follows the uplink, without conntrack\n" +
			"On a Linux host with more than one uplink, a locally originated\n" +
			"connection that the host's marks or rules send out of a second ISP\n" +
			"keeps the first ISP's source address, and the second ISP drops it.\n" +
			"rerouted decides each new local flow (at connect() with a cgroup BPF\n" +
			"program, or at its first packet through NFQUEUE) and has nftables\n" +
			"translate its source address, without conntrack or MASQUERADE.",
		MTime: o.Date,
		Overridables: nfpm.Overridables{
			Depends:  slices.DeleteFunc([]string{libc}, func(s string) bool { return s == "" }),
			Contents: contents,
			Scripts: nfpm.Scripts{
				PostInstall: src("packaging/postinst"),
				PreRemove:   src("packaging/prerm"),
				PostRemove:  src("packaging/postrm"),
			},
			Deb: nfpm.Deb{Compression: "xz"},
		},
	}
	info = nfpm.WithDefaults(info)
	if err := nfpm.PrepareForPackager(info, "deb"); err != nil {
		return "", err
	}
	out := filepath.Join(o.Out, deb.Default.ConventionalFileName(info))
	f, err := os.Create(out)
	if err != nil {
		return "", err
	}
	if err := deb.Default.Package(info, f); err != nil {
		f.Close()
		os.Remove(out)
		return "", err
	}
	return out, f.Close()
}

// PackagedUnit is the example unit with the binary at /usr/sbin.
func PackagedUnit(example string) string {
	return strings.ReplaceAll(example, "/usr/local/bin/rerouted", "/usr/sbin/rerouted")
}

// changelog is changelog.Debian's one entry: this build.
func changelog(version string, o Options) string {
	return fmt.Sprintf("rerouted (%s) unstable; urgency=medium\n\n  * Built from git %s.\n\n -- %s  %s\n",
		version, strings.TrimSpace(o.Describe), o.Maintainer, o.Date.Format(time.RFC1123Z))
}

// gzipped compresses b as gzip -9n does: no name, the given time.
func gzipped(b []byte, mtime time.Time) ([]byte, error) {
	var buf bytes.Buffer
	w, err := gzip.NewWriterLevel(&buf, gzip.BestCompression)
	if err != nil {
		return nil, err
	}
	w.ModTime = mtime
	if _, err := w.Write(b); err != nil {
		return nil, err
	}
	if err := w.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// libcDepends is the binary's dependency on the C library (cgo: os/user
// asks NSS for user names), from the newest GLIBC_ symbol version it
// imports, as dpkg-shlibdeps would say; for a static binary, none.
func libcDepends(binary string) (string, error) {
	f, err := elf.Open(binary)
	if err != nil {
		return "", err
	}
	defer f.Close()
	if f.Section(".dynamic") == nil {
		return "", nil // static
	}
	syms, err := f.ImportedSymbols()
	if err != nil {
		return "", fmt.Errorf("%s: %w", binary, err)
	}
	var newest []int
	for _, s := range syms {
		v, ok := strings.CutPrefix(s.Version, "GLIBC_")
		if !ok {
			continue
		}
		var n []int
		for _, p := range strings.Split(v, ".") {
			i, err := strconv.Atoi(p)
			if err != nil {
				n = nil
				break
			}
			n = append(n, i)
		}
		if n != nil && slices.Compare(n, newest) > 0 {
			newest = n
		}
	}
	if newest == nil {
		return "libc6", nil
	}
	s := make([]string, len(newest))
	for i, n := range newest {
		s[i] = strconv.Itoa(n)
	}
	return "libc6 (>= " + strings.Join(s, ".") + ")", nil
}
