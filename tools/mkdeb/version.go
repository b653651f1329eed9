package main

import (
	"fmt"
	"regexp"
	"strings"
)

// describeRE splits `git describe --tags --always --dirty`: a tag, the
// commits since it and the commit (-N-gHASH), and -dirty.
var describeRE = regexp.MustCompile(`^(.*?)(?:-(\d+)-g([0-9a-f]+))?(-dirty)?$`)

// hashRE is what --always prints where no tag is reachable.
var hashRE = regexp.MustCompile(`^[0-9a-f]{7,40}$`)

// debVersion maps git describe's output to a Debian version that sorts as
// the builds do:
//
//	v1.2.3                 1.2.3
//	v1.2.3-rc1             1.2.3~rc1          (before 1.2.3)
//	v1.2.3-4-gabc1234      1.2.3+4.gabc1234   (after 1.2.3)
//	v1.2.3-4-gabc1234-dirty 1.2.3+4.gabc1234.dirty
//	abc1234 (no tag)       0.0~git.abc1234    (before any release)
//	abc1234-dirty          0.0~git.abc1234.dirty
//
// The leading v goes; a hyphen in the tag (a pre-release) becomes ~, so
// the release sorts after it; any other character Debian does not allow
// becomes a dot. A version that would not start with a digit gets "0~".
// This is the upstream part; Build appends the Debian revision, -1.
func debVersion(describe string) (string, error) {
	d := strings.TrimSpace(describe)
	if d == "" {
		return "", fmt.Errorf("empty version (git describe printed nothing: not a git checkout? set VERSION)")
	}
	m := describeRE.FindStringSubmatch(d)
	tag, n, hash, dirty := m[1], m[2], m[3], m[4] != ""
	var v string
	var extra []string
	switch {
	case n == "" && hashRE.MatchString(tag):
		v, extra = "0.0~git", []string{tag}
	default:
		tag = strings.TrimPrefix(tag, "v")
		pre := ""
		if i := strings.IndexByte(tag, '-'); i >= 0 {
			tag, pre = tag[:i], tag[i+1:]
		}
		v = clean(tag)
		if pre != "" {
			v += "~" + clean(pre)
		}
		if n != "" {
			v += "+" + n
			extra = []string{"g" + hash}
		}
	}
	if dirty {
		extra = append(extra, "dirty")
	}
	if len(extra) > 0 {
		sep := "."
		if !strings.ContainsAny(v, "+~") {
			sep = "+"
		}
		v += sep + strings.Join(extra, ".")
	}
	if v == "" || v[0] < '0' || v[0] > '9' {
		v = "0~" + v
	}
	return v, nil
}

// clean replaces what a Debian upstream version may not hold (without a
// revision: letters, digits, . + ~) with dots.
func clean(s string) string {
	return strings.Map(func(r rune) rune {
		switch {
		case r >= '0' && r <= '9', r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r == '.', r == '+', r == '~':
			return r
		}
		return '.'
	}, s)
}
