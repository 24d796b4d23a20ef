"""Inference sessions: what a session answers (stream.py, the InferStream's and the session port's alike) and
the plain TCP port that carries them without HTTP/2 (port.py, `serve --session-port`)."""
