"""`splitprune bench adaptive`: the any-budget model against dedicated ones (accuracy), `--budget auto` over
every shipped trace (inference) and through a fading link (training), with their figures (plot)."""
