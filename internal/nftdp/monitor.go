package nftdp

import "github.com/rerouted/rerouted/internal/nftmon"

// Monitor subscribes to the nftables notifications about the table, less
// the datapath's own changes (its per-flow transactions above all). Call it
// before anything can damage the table, and Close it before removing the
// table.
func (d *Datapath) Monitor() (*nftmon.Monitor, error) {
	return nftmon.Open(TableName, [2]uint32{d.batches.PortID(), d.connPort})
}
