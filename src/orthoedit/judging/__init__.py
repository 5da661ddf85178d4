"""The one judging layer: every stage that asks a model and reads its answer (measure's
filter, search's trials and front, search --confirm, eval safety, compare, study sites) turns
prompts into answers and answers into verdicts here: refused, evasive, complied, broken,
unjudged; and one failure rate from them (``verdicts.failure_rate``). It sits above
``runtime`` (which generates) and below the stages, and imports no stage."""
