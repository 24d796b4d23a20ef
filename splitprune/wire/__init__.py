"""The wire protocol, torch-free (the device package ships it): the tensor codec core (codec), the typed
refusals (refusals), the gRPC envelope (envelopes), channel settings (channels), addresses and byte
reports (accounting). Everything that crosses the network is defined here; training imports its
refusals, the server and the client speak it."""
