"""A tier of server replicas kept consistent over torch.distributed (docs/replicas.md): the tier thread
(tier) and one weighted averaging of a half (averaging)."""
