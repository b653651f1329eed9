// Package tomlpos finds where things are written in a TOML file, for
// errors that name their place as FILE:LINE:COL: the key paths of a file
// (Locate), and the line and column of a byte offset (LineCol).
package tomlpos

import (
	"bytes"
	"fmt"
	"strings"
)

// Index maps a key path such as "rule.2.dport" (the third [[rule]]'s
// dport) to where it is written. The TOML library keys its positions by name
// only, so every [[rule]] would share one entry; this index keeps them apart.
type Index map[string][2]int

// Of returns the line and column of path, or of its nearest written parent.
func (ps Index) Of(path string) (int, int) {
	for {
		if p, ok := ps[path]; ok {
			return p[0], p[1]
		}
		i := strings.LastIndexByte(path, '.')
		if i < 0 {
			return 1, 1
		}
		path = path[:i]
	}
}

// Locate indexes the table headers and keys of a syntactically valid file. It
// understands what rerouted's configuration uses: [table], [[array]], key =
// value, comments and values spanning several lines.
func Locate(src string) Index {
	ps := Index{}
	count := map[string]int{}
	table := ""
	depth := 0           // open brackets of a value spanning lines
	inMultiline := false // inside a """ or ''' string
	lineNo := 0
	// Line by line without a slice of them all: a generated list can have
	// hundreds of thousands.
	for line := range strings.SplitSeq(src, "\n") {
		lineNo++
		if inMultiline {
			if strings.Count(line, `"""`)%2 == 1 || strings.Count(line, "'''")%2 == 1 {
				inMultiline = false
			}
			continue
		}
		if depth > 0 {
			depth += bracketBalance(line)
			continue
		}
		trimmed := strings.TrimLeft(line, " \t")
		col := len(line) - len(trimmed) + 1
		switch {
		case trimmed == "" || trimmed[0] == '#':
		case strings.HasPrefix(trimmed, "[["):
			name := headerName(trimmed[2:], "]]")
			table = fmt.Sprintf("%s.%d", name, count[name])
			count[name]++
			ps[table] = [2]int{lineNo, col}
		case trimmed[0] == '[':
			table = headerName(trimmed[1:], "]")
			// A subtable of the latest [[array]] table, like
			// [uplink.health] after an [[uplink]], belongs to it.
			if first, rest, ok := strings.Cut(table, "."); ok && count[first] > 0 {
				table = fmt.Sprintf("%s.%d.%s", first, count[first]-1, rest)
			}
			ps[table] = [2]int{lineNo, col}
		default:
			eq := strings.IndexByte(trimmed, '=')
			if eq < 0 {
				continue
			}
			key := strings.Trim(strings.TrimSpace(trimmed[:eq]), `"'`)
			path := key
			if table != "" {
				path = table + "." + key
			}
			ps[path] = [2]int{lineNo, col}
			value := trimmed[eq+1:]
			if strings.Count(value, `"""`)%2 == 1 || strings.Count(value, "'''")%2 == 1 {
				inMultiline = true
			}
			depth = bracketBalance(value)
		}
	}
	return ps
}

func headerName(s, closer string) string {
	if i := strings.Index(s, closer); i >= 0 {
		s = s[:i]
	}
	return strings.Trim(strings.TrimSpace(s), `"'`)
}

// bracketBalance counts [ minus ] outside strings and comments.
func bracketBalance(s string) int {
	n := 0
	var quote byte
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case quote != 0:
			if c == '\\' && quote == '"' {
				i++
			} else if c == quote {
				quote = 0
			}
		case c == '"' || c == '\'':
			quote = c
		case c == '#':
			return n
		case c == '[':
			n++
		case c == ']':
			n--
		}
	}
	return n
}

// LineCol converts a byte offset to a 1-based line and column. (The TOML
// library counts a newline that ends a bad line as the start of the next.)
func LineCol(src []byte, off int) (int, int) {
	off = min(max(off, 0), len(src))
	line := 1 + bytes.Count(src[:off], []byte("\n"))
	return line, off - bytes.LastIndexByte(src[:off], '\n')
}
