"""orthoedit measure: the candidates (candidates), the choice among them (select) and its figure
(plots)."""
