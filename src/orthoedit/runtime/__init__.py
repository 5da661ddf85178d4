"""Running a chat model: loading it and its chat template (session), run-time interventions (hooks)
and greedy generation with the refusal judgement (refusal)."""
