"""The gRPC server: five concepts, each named once.

- ServerHalf (training.halves): the decoder and the rest of the network, an nn.Module;
- ServerWorker (training.server_worker): runs steps on a ServerHalf, decodes and checks every message, saves and
  loads its own state;
- HostedHalf (hosting): a ServerWorker hosted for one config fingerprint, its lock and client records;
- SplitService (service): the hosted halves, the sessions on them, and what each message does;
- Servicer (servicer): the gRPC methods over a SplitService, protocol-unaware.

Around them: app (start, stop, housekeeping), sessions, batching, store (disk), transfer (state and
inference calls), validation (handshake checks), metrics, health, ratelog, replicas (a tier of servers),
inference (an inference session's answers, and the plain TCP session port: SessionPort).
"""
