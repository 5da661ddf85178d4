"""Evaluating an edit: eval bench (bench), eval kl (kl), eval safety and the safety judge (safety),
compare (compare)."""
