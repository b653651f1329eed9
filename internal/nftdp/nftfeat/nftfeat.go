// Package nftfeat is what of nftables rerouted's table needs that a kernel
// may lack: the features (each with a probe, Probe to try them all), the
// error that names those missing (KernelError), and the one thing kernels
// differ in that the table adapts to, the enqueue statement (QueueTo builds
// either form). The table of kernels in docs/design.md lists the same features.
package nftfeat

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/xt"
	"golang.org/x/sys/unix"
)

// Feature is something of nftables the table needs that a kernel may lack:
// it is too old, was built without it, or a module is missing or could not
// be loaded (a chroot without the kernel's modules, say).
type Feature struct {
	Name    string   // what it is, as docs/design.md's table of kernels names it
	Modules []string // the modules that provide it, where it is not built in
	Since   string   // the mainline kernel that brought it
	// alt: another feature that does the same job (the two enqueue forms).
	alt string
	// probe adds what needs the feature to a scratch table t with a
	// regular chain ch.
	probe func(c *nftables.Conn, t *nftables.Table, ch *nftables.Chain) error
}

func (f Feature) String() string {
	if len(f.Modules) == 0 {
		return fmt.Sprintf("%s (Linux %s)", f.Name, f.Since)
	}
	word := "module"
	if len(f.Modules) > 1 {
		word = "modules"
	}
	return fmt.Sprintf("%s (Linux %s; %s %s)", f.Name, f.Since, word, strings.Join(f.Modules, ", "))
}

// Names of the two enqueue forms (also nftdp.Datapath.QueueMethod's
// values).
const (
	QueueNative = "nft queue"
	QueueXT     = "xt NFQUEUE"
)

// Features are the kernel features the table uses, in the order a missing
// one is best reported. A feature the table comes to use gets a probe here
// (and a row in docs/design.md's table of kernels).
var Features = []Feature{
	{Name: "the nft queue statement", Modules: []string{"nft_queue", "nfnetlink_queue"}, Since: "3.14", alt: QueueXT,
		probe: rule(QueueTo(0, 1, true, true, true))},
	{Name: "the xtables NFQUEUE target in nft rules", Modules: []string{"nft_compat", "xt_NFQUEUE", "nfnetlink_queue"}, Since: "3.13", alt: QueueNative,
		probe: rule(QueueTo(0, 1, false, true, true))},
	{Name: "the fib expression", Modules: []string{"nft_fib_inet", "nft_fib_ipv4", "nft_fib_ipv6"}, Since: "4.10",
		probe: rule(&expr.Fib{Register: 1, FlagDADDR: true, ResultADDRTYPE: true})},
	{Name: "counters", Modules: []string{"nft_counter"}, Since: "3.13",
		probe: rule(&expr.Counter{})},
	{Name: "the limit expression", Modules: []string{"nft_limit"}, Since: "3.13",
		probe: rule(&expr.Limit{Type: expr.LimitTypePkts, Rate: 1, Unit: expr.LimitTimeSecond, Burst: 1})},
	{Name: "set updates from the packet path with timeouts and a limit per element", Modules: []string{"nft_limit"}, Since: "4.3",
		probe: func(c *nftables.Conn, t *nftables.Table, ch *nftables.Chain) error {
			s := &nftables.Set{Table: t, Name: "meter", KeyType: nftables.TypeIPAddr, Dynamic: true, HasTimeout: true,
				Timeout: time.Second, Size: 16}
			if err := c.AddSet(s, nil); err != nil {
				return err
			}
			c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: []expr.Any{
				&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 12, Len: 4},
				&expr.Dynset{SrcRegKey: 1, SetName: s.Name, Operation: unix.NFT_DYNSET_OP_UPDATE, Timeout: time.Second,
					Exprs: []expr.Any{&expr.Limit{Type: expr.LimitTypePkts, Rate: 1, Unit: expr.LimitTimeSecond, Burst: 1}}},
			}})
			return nil
		}},
	{Name: "counters in set elements", Since: "5.7",
		probe: func(c *nftables.Conn, t *nftables.Table, _ *nftables.Chain) error {
			return c.AddSet(&nftables.Set{Table: t, Name: "counted", KeyType: nftables.TypeIPAddr, Counter: true}, nil)
		}},
	{Name: "payload writes that fix the transport checksum's pseudo-header (csum_flags)", Since: "4.10",
		probe: rule(
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 4},
			&expr.Payload{OperationType: expr.PayloadWrite, SourceRegister: 1, Base: expr.PayloadBaseNetworkHeader,
				Offset: 12, Len: 4, CsumType: expr.CsumTypeInet, CsumOffset: 10, CsumFlags: unix.NFT_PAYLOAD_L4CSUM_PSEUDOHDR})},
	{Name: "maps whose data is a concatenation longer than 16 bytes (IPv6 address . port . mark), looked up into registers", Since: "5.8",
		probe: func(c *nftables.Conn, t *nftables.Table, ch *nftables.Chain) error {
			key, err := nftables.ConcatSetType(nftables.TypeIP6Addr, nftables.TypeInetService)
			if err != nil {
				return err
			}
			data, err := nftables.ConcatSetType(nftables.TypeIP6Addr, nftables.TypeInetService, nftables.TypeMark)
			if err != nil {
				return err
			}
			m := &nftables.Set{Table: t, Name: "wide", IsMap: true, Concatenation: true, KeyType: key, DataType: data}
			if err := c.AddSet(m, nil); err != nil {
				return err
			}
			c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: []expr.Any{
				&expr.Payload{DestRegister: 8, Base: expr.PayloadBaseNetworkHeader, Offset: 8, Len: 16},
				&expr.Payload{DestRegister: 12, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 2},
				&expr.Lookup{SourceRegister: 8, SetName: m.Name, DestRegister: 16, IsDestRegSet: true},
				&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: 21},
			}})
			return nil
		}},
}

// KernelDecisions are the features with which the kernel decides
// host-marked flows itself (nftdp's hostmark.go). A kernel without them
// still runs rerouted: the queue decides those flows.
var KernelDecisions = []Feature{
	{Name: "updates of maps with data (and counters in their elements) from the packet path", Since: "5.11",
		probe: func(c *nftables.Conn, t *nftables.Table, ch *nftables.Chain) error {
			m := &nftables.Set{Table: t, Name: "learned", IsMap: true, KeyType: nftables.TypeIPAddr, DataType: nftables.TypeIPAddr,
				Dynamic: true, Size: 16, Counter: true}
			if err := c.AddSet(m, nil); err != nil {
				return err
			}
			c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: []expr.Any{
				&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 12, Len: 4},
				&expr.Payload{DestRegister: 2, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 4},
				&expr.Dynset{SrcRegKey: 1, SrcRegData: 2, SetName: m.Name, Operation: unix.NFT_DYNSET_OP_ADD},
			}})
			return nil
		}},
	{Name: "the socket expression (is a reply's tuple a local socket's?)", Modules: []string{"nft_socket"}, Since: "5.3",
		probe: rule(&expr.Socket{Key: expr.SocketKeyWildcard, Register: 1})},
	{Name: "logging to an NFLOG group", Modules: []string{"nft_log", "nfnetlink_log"}, Since: "3.13",
		probe: rule(&expr.Log{Key: 1 << unix.NFTA_LOG_GROUP, Group: 1})},
	{Name: "TCP option writes (the MSS of a SYN)", Modules: []string{"nft_exthdr"}, Since: "4.14",
		probe: rule(&expr.Immediate{Register: 1, Data: []byte{5, 0xb4}},
			&expr.Exthdr{Op: expr.ExthdrOpTcpopt, Type: 2, Offset: 2, Len: 2, SourceRegister: 1})},
}

// ProbeKernelDecisions returns the features of KernelDecisions the kernel
// lacks (none: it decides host-marked flows itself).
func ProbeKernelDecisions() ([]Feature, error) {
	c, err := nftables.New()
	if err != nil {
		return nil, fmt.Errorf("nftables netlink: %w", err)
	}
	defer c.CloseLasting()
	_, lacks, err := probe(c, KernelDecisions)
	return lacks, err
}

func rule(es ...expr.Any) func(*nftables.Conn, *nftables.Table, *nftables.Chain) error {
	return func(c *nftables.Conn, t *nftables.Table, ch *nftables.Chain) error {
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: es})
		return nil
	}
}

// Probe tries each feature in a scratch table of its own (inet
// rerouted_probe_PID, in a regular chain no packet reaches; removed again)
// in the caller's network namespace, and returns the features the kernel
// lacks and the enqueue form it has (QueueNative first; "" for none). Of
// the two enqueue forms, one is enough: both are missing, or neither.
// Probing needs CAP_NET_ADMIN; err is an error that is not about a
// feature (nftables does not answer at all, for one).
func Probe() (missing []Feature, queue string, err error) {
	c, err := nftables.New()
	if err != nil {
		return nil, "", fmt.Errorf("nftables netlink: %w", err)
	}
	defer c.CloseLasting()
	has, lacks, err := probe(c, Features)
	if err != nil {
		return nil, "", err
	}
	if has[Features[0].Name] {
		queue = QueueNative
	} else if has[Features[1].Name] {
		queue = QueueXT
	}
	for _, f := range lacks {
		if f.alt != "" && queue != "" {
			continue
		}
		missing = append(missing, f)
	}
	return missing, queue, nil
}

// probe tries each feature in a scratch table of its own.
func probe(c *nftables.Conn, features []Feature) (has map[string]bool, lacks []Feature, err error) {
	t := &nftables.Table{Name: fmt.Sprintf("rerouted_probe_%d", os.Getpid()), Family: nftables.TableFamilyINet}
	has = map[string]bool{}
	for _, f := range features {
		c.AddTable(t)
		ch := c.AddChain(&nftables.Chain{Name: "probe", Table: t})
		perr := f.probe(c, t, ch)
		if perr == nil {
			perr = c.Flush()
		}
		c.DelTable(t)
		if derr := c.Flush(); derr != nil && !errors.Is(derr, unix.ENOENT) {
			return nil, nil, fmt.Errorf("remove probe table inet %s: %w", t.Name, derr)
		}
		switch {
		case perr == nil:
			has[f.Name] = true
		case errors.Is(perr, unix.EPERM):
			return nil, nil, fmt.Errorf("probe kernel features: %w", perr)
		case errors.Is(perr, unix.ENOENT), errors.Is(perr, unix.EOPNOTSUPP), errors.Is(perr, unix.EINVAL),
			errors.Is(perr, unix.ERANGE), errors.Is(perr, unix.E2BIG):
			lacks = append(lacks, f)
		default:
			return nil, nil, fmt.Errorf("probe %s: %w", f.Name, perr)
		}
	}
	return has, lacks, nil
}

// KernelError is an installation that failed because the kernel lacks
// features the table needs (Missing, from Probe), or, when the probe named
// none, because an nftables expression was not found (ENOENT).
type KernelError struct {
	Missing []Feature
	Err     error
}

func (e *KernelError) Error() string {
	if len(e.Missing) == 0 {
		return fmt.Sprintf("the kernel lacks an nftables feature rerouted uses: a kernel module is likely missing or cannot be loaded "+
			"(nft_queue, or nft_compat with xt_NFQUEUE; nft_fib_inet, nft_counter, nft_limit; `rerouted doctor` checks each): %v", e.Err)
	}
	var names []string
	for _, f := range e.Missing {
		names = append(names, f.String())
	}
	return fmt.Sprintf("the kernel lacks %s: %v", strings.Join(names, "; and "), e.Err)
}

func (e *KernelError) Unwrap() error { return e.Err }

// Diagnose makes err, an installation's, a KernelError when the kernel
// lacks a feature; other errors are returned as they are.
func Diagnose(err error) error {
	if err == nil {
		return nil
	}
	missing, _, perr := Probe()
	if perr == nil && len(missing) > 0 {
		return &KernelError{Missing: missing, Err: err}
	}
	if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EOPNOTSUPP) {
		return &KernelError{Err: err}
	}
	return err
}

// QueueTo queues to first..first+total-1; with bypass, without a daemon the
// packet goes on as if the rule were not there (fail-open), else it is
// dropped (fail-closed). With byCPU the queue is the
// packet's CPU's; else a hash of the address pair picks it, the same for
// every packet between two hosts in either direction. A flow whose every
// packet is queued must use the hash: packets of one flow arrive on either
// CPU, and two workers would reinject them out of order (seen: a duplicate
// segment to a TIME_WAIT socket, the peer's RST, the TIME_WAIT killed).
func QueueTo(first, total uint16, native, byCPU, bypass bool) expr.Any {
	fanout := total > 1 && byCPU
	if native {
		flag := expr.QueueFlag(0)
		if bypass {
			flag |= expr.QueueFlagBypass
		}
		if fanout {
			flag |= expr.QueueFlagFanout
		}
		return &expr.Queue{Num: first, Total: total, Flag: flag}
	}
	// struct xt_NFQ_info_v3 { u16 queuenum, queues_total, flags }, XT_ALIGNed;
	// flags: 1 bypass, 2 CPU fanout.
	info := make(xt.Unknown, 8)
	binary.NativeEndian.PutUint16(info[0:], first)
	binary.NativeEndian.PutUint16(info[2:], total)
	flags := uint16(0)
	if bypass {
		flags |= 1
	}
	if fanout {
		flags |= 2
	}
	binary.NativeEndian.PutUint16(info[4:], flags)
	return &expr.Target{Name: "NFQUEUE", Rev: 3, Info: &info}
}
