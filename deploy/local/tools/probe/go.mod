module tidal.rs/deploy/local/tools/probe

go 1.26.8
