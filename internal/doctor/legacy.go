package doctor

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/rerouted/rerouted/internal/policy"
)

// iptables-legacy keeps its rules in the kernel's x_tables, which nftables
// does not see: its MASQUERADE and SNAT rules are read with
// iptables-legacy-save (doctor runs it; the daemon never runs anything).
var legacyFamilies = []struct {
	names string // the kernel's list of x_tables tables in use, in /proc/net
	cmd   string // the command that changes them
	save  string // the command that prints them
}{
	{"ip_tables_names", "iptables-legacy", "iptables-legacy-save"},
	{"ip6_tables_names", "ip6tables-legacy", "ip6tables-legacy-save"},
}

// lookTool finds a program in PATH or, since doctor may run with a user's
// PATH, in /usr/sbin and /sbin; "" if it is not installed. Tests replace it.
var lookTool = func(name string) string {
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	for _, dir := range []string{"/usr/sbin", "/sbin"} {
		p := filepath.Join(dir, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p
		}
	}
	return ""
}

// checkLegacyNAT looks for MASQUERADE and SNAT in iptables-legacy's nat
// tables that apply to an uplink's interface. Only a table the kernel has
// in use is read: listing it would otherwise create it.
func checkLegacyNAT(r *Report, uplinks []*policy.Uplink, o Options) {
	found, inUse := false, false
	for _, fam := range legacyFamilies {
		names := filepath.Join(o.ProcNet, fam.names)
		if !tableInUse(names, "nat") {
			continue
		}
		inUse = true
		bin := lookTool(fam.save)
		if bin == "" {
			found = true
			r.problem(fmt.Sprintf("install %s (Debian: apt-get install iptables) and run doctor again", fam.save),
				"%s's nat table is in use (%s lists it), but %s is not installed: its MASQUERADE and SNAT rules cannot be checked", fam.cmd, names, fam.save)
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		var stderr bytes.Buffer
		cmd := exec.CommandContext(ctx, bin, "-t", "nat")
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		cancel()
		if err != nil {
			found = true
			r.problem("run doctor as root", "cannot read %s's nat table: %s -t nat: %v: %s", fam.cmd, bin, err, bytes.TrimSpace(stderr.Bytes()))
			continue
		}
		for _, u := range uplinks {
			seen := map[string]bool{}
			for _, n := range parseLegacyNAT(string(out)) {
				where, applies := natWhere(u, n.oif)
				if !applies || seen[n.chain+" "+n.spec] {
					continue
				}
				seen[n.chain+" "+n.spec] = true
				found = true
				chain := n.chain
				if n.chain != "POSTROUTING" {
					chain += " (reached from POSTROUTING)"
				}
				r.problem(fmt.Sprintf("remove it: %s -t nat -D %s %s (and from the rules restored at boot); rerouted gives the uplink's address to the flows routed there, without conntrack", fam.cmd, n.chain, n.spec),
					"uplink %q: %s %s in nat chain %s (%s) applies to %s; conntrack NAT rewrites the reply tuple of translated flows", u.Name, fam.cmd, n.kind, chain, n.spec, where)
			}
		}
	}
	switch {
	case !inUse:
		r.ok("no iptables-legacy nat table is in use")
	case !found:
		r.ok("no iptables-legacy MASQUERADE or SNAT applies to an uplink")
	}
}

// tableInUse reports whether the kernel's list of x_tables tables (one name
// a line) has table. A missing list (no x_tables module loaded) has none.
func tableInUse(list, table string) bool {
	b, err := os.ReadFile(list)
	if err != nil {
		return false
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.TrimSpace(l) == table {
			return true
		}
	}
	return false
}

// legacyNAT is a MASQUERADE or SNAT rule in an iptables-save nat table.
type legacyNAT struct {
	chain string    // the chain holding it
	spec  string    // the rule as -A/-D CHAIN take it, as saved
	kind  string    // MASQUERADE or SNAT
	oif   []ifMatch // output-interface conditions: the jumps' that reach it, then its own
}

// legacyRule is one rule of an iptables-save listing.
type legacyRule struct {
	spec   string
	target string // -j or -g
	oif    *ifMatch
}

// parseLegacyNAT reads iptables-save output and returns the MASQUERADE and
// SNAT rules that POSTROUTING reaches, directly or through jumps to chains
// of its own, with the output-interface conditions on the way.
func parseLegacyNAT(save string) []legacyNAT {
	chains := map[string][]legacyRule{}
	inNAT := false
	sc := bufio.NewScanner(strings.NewReader(save))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case strings.HasPrefix(line, "*"):
			inNAT = line == "*nat"
		case !inNAT:
		case strings.HasPrefix(line, ":"):
			if f := strings.Fields(line[1:]); len(f) > 0 {
				if _, ok := chains[f[0]]; !ok {
					chains[f[0]] = nil // declared, maybe empty
				}
			}
		case strings.HasPrefix(line, "-A "):
			f := strings.SplitN(line, " ", 3)
			if len(f) < 3 {
				continue
			}
			chains[f[1]] = append(chains[f[1]], parseLegacyRule(f[2]))
		}
	}
	var out []legacyNAT
	var walk func(chain string, oif []ifMatch, depth int)
	walk = func(chain string, oif []ifMatch, depth int) {
		for _, ru := range chains[chain] {
			conds := oif
			if ru.oif != nil {
				conds = append(append([]ifMatch(nil), oif...), *ru.oif)
			}
			switch t := ru.target; {
			case t == "MASQUERADE" || t == "SNAT":
				out = append(out, legacyNAT{chain: chain, spec: ru.spec, kind: t, oif: conds})
			case builtinChain[t] || depth >= 32: // the kernel refuses loops; this is a guard
			default:
				if _, ok := chains[t]; ok {
					walk(t, conds, depth+1)
				}
			}
		}
	}
	walk("POSTROUTING", nil, 0)
	return out
}

var builtinChain = map[string]bool{"PREROUTING": true, "INPUT": true, "FORWARD": true, "OUTPUT": true, "POSTROUTING": true}

// parseLegacyRule reads a rule's spec (what follows "-A CHAIN"): its target
// and its output-interface condition.
func parseLegacyRule(spec string) legacyRule {
	ru := legacyRule{spec: spec}
	args := splitSave(spec)
	neg := false
	for i := 0; i < len(args); i++ {
		switch a := args[i]; a {
		case "!":
			neg = true
			continue
		case "-o", "--out-interface":
			if i+1 < len(args) && args[i+1] == "!" { // the old "-o ! eth0"
				neg = true
				i++
			}
			if i+1 < len(args) {
				i++
				name := args[i]
				m := ifMatch{name: strings.TrimSuffix(name, "+"), prefix: strings.HasSuffix(name, "+"), neg: neg}
				ru.oif = &m
			}
		case "-j", "--jump", "-g", "--goto":
			if i+1 < len(args) {
				i++
				ru.target = args[i]
			}
		}
		neg = false
	}
	return ru
}

// splitSave splits an iptables-save rule into its words: iptables-save
// puts words with spaces in double quotes, with \" and \\ inside.
func splitSave(s string) []string {
	var words []string
	var w strings.Builder
	inWord, quoted := false, false
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case quoted && c == '\\' && i+1 < len(s):
			i++
			w.WriteByte(s[i])
		case c == '"':
			quoted, inWord = !quoted, true
		case !quoted && (c == ' ' || c == '\t'):
			if inWord {
				words = append(words, w.String())
				w.Reset()
				inWord = false
			}
		default:
			w.WriteByte(c)
			inWord = true
		}
	}
	if inWord {
		words = append(words, w.String())
	}
	return words
}
