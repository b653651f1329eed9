package daemon

import (
	"github.com/rerouted/rerouted/internal/packet"
	"github.com/rerouted/rerouted/internal/policy"
	"github.com/rerouted/rerouted/internal/steer"
)

// Connect-time steering ([daemon] steering = "connect") is package steer;
// here the daemon starts and stops it, and counts its failures.

// startSteering loads and attaches the program, and installs cfg's image.
func (d *Daemon) startSteering(cfg *policy.Config) error {
	s, err := steer.Open(cfg, steer.Deps{Datapath: d.dp, States: &d.uplinks, Events: d.shared.Events, Log: d.log,
		Moved: d.metrics.Moved, LookupErrors: &d.shared.Stats.Errors[packet.ErrSocketLookup]})
	if err != nil {
		return err
	}
	if err := s.Start(cfg, d.shared.PortLo, d.shared.PortHi); err != nil {
		return err
	}
	// Published for the other goroutines only once it runs; a change of
	// state since Start published them is published again.
	d.steer.Store(s)
	d.republishSteering()
	return nil
}

// stopSteering detaches the program, or with keep leaves it pinned and
// deciding for the next run.
func (d *Daemon) stopSteering(keep bool) error {
	s := d.steer.Swap(nil)
	if s == nil {
		return nil
	}
	return s.Stop(keep)
}

// applySteering installs a reloaded policy's image.
func (d *Daemon) applySteering(cfg *policy.Config) {
	s := d.steer.Load()
	if s == nil {
		return
	}
	if err := s.Apply(cfg); err != nil {
		d.errors[errInstall].Add(1)
		d.log.Error("reload: connect steering keeps the earlier policy's rules", "err", err)
	}
}

// publishSteering tells the program the uplinks' states and addresses, and
// the table which sockets are on their uplink already.
func (d *Daemon) publishSteering() error {
	s := d.steer.Load()
	if s == nil {
		return nil
	}
	return s.Publish(d.cfg.Load())
}

// republishSteering publishes the uplinks' states once after a burst of
// routing changes or a probe's verdicts, counting and logging a failure.
func (d *Daemon) republishSteering() {
	if err := d.publishSteering(); err != nil {
		d.errors[errInstall].Add(1)
		d.log.Error("connect steering: publish uplink states", "err", err)
	}
}
