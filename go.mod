module github.com/rerouted/rerouted

go 1.26

require (
	github.com/BurntSushi/toml v1.6.0
	github.com/gopacket/gopacket v1.7.7
	golang.org/x/sys v0.45.0
)
