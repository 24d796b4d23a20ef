"""The seed paper's claims: deprune and prune against sl and ca (deprune, prune), resolution compression
(resolution), rate against accuracy (rate, measure, baselines), time to accuracy over a link (link_time)."""
