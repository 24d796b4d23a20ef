"""What a run records about itself besides its checkpoint: summary.json (summary) and the byte journal of
a remote run (journal)."""
