"""The client side of the network runtime: the connection and its Train stream (channel), opening a training
session (connect), the trainer's remote endpoint (remote), split inference calls (inference) and byte
accounting on the socket (traffic)."""
