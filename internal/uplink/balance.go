package uplink

import (
	"math/rand/v2"
	"net/netip"
	"sync"
	"time"

	"github.com/rerouted/rerouted/internal/policy"
)

// Balancing: each new flow a balance rule matches picks one of the rule's
// uplinks that is up, at random by weight, and keeps it for its life (its
// element pins the uplink's mark). With sticky = "destination", a user's
// new flows to one destination take the uplink that user's last flow to it
// took, for sticky_for after that flow: services that tie a session to the
// client's address see one address.

// stickyKey is a user and a destination.
type stickyKey struct {
	rule *policy.Rule
	uid  uint32
	dst  netip.Addr
}

type stickyEntry struct {
	mark uint32
	last time.Time
}

// A Balancer picks balance rules' uplinks and holds their sticky choices;
// the daemon's sweeper drops expired ones (Expire). It is safe for
// concurrent use.
type Balancer struct {
	mu sync.Mutex
	m  map[stickyKey]stickyEntry
}

// Pick picks the mark of one of r's uplinks that is up in states:
// "default" (the host's routing) is mark 0. It reports false when none is
// up.
func (b *Balancer) Pick(states *States, r *policy.Rule, uid uint32, dst netip.Addr, v6 bool) (uint32, bool) {
	a := &r.Action
	now := time.Now()
	var key stickyKey
	if a.Sticky {
		key = stickyKey{rule: r, uid: uid, dst: dst}
		b.mu.Lock()
		e, ok := b.m[key]
		b.mu.Unlock()
		if ok && now.Sub(e.last) < a.StickyFor && states.Up(e.mark, v6) {
			b.stick(key, e.mark, now)
			return e.mark, true
		}
	}
	total := 0
	for i, c := range a.Choices {
		if c.Uplink == nil || states.Up(c.Uplink.Mark, v6) {
			total += a.Weights[i]
		}
	}
	if total == 0 {
		return 0, false
	}
	n := int(rand.Uint32N(uint32(total)))
	for i, c := range a.Choices {
		if c.Uplink != nil && !states.Up(c.Uplink.Mark, v6) {
			continue
		}
		if n -= a.Weights[i]; n < 0 {
			var mark uint32
			if c.Uplink != nil {
				mark = c.Uplink.Mark
			}
			if a.Sticky {
				b.stick(key, mark, now)
			}
			return mark, true
		}
	}
	return 0, false // not reached: the weights add up
}

func (b *Balancer) stick(k stickyKey, mark uint32, now time.Time) {
	b.mu.Lock()
	if b.m == nil {
		b.m = map[stickyKey]stickyEntry{}
	}
	b.m[k] = stickyEntry{mark: mark, last: now}
	b.mu.Unlock()
}

// Expire forgets sticky choices older than their rule's sticky_for.
func (b *Balancer) Expire(now time.Time) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for k, e := range b.m {
		if now.Sub(e.last) >= k.rule.Action.StickyFor {
			delete(b.m, k)
		}
	}
}
