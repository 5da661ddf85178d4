"""The weight edit: the projection math (ortho), the plan (plan), the streaming writer (writer),
orthoedit apply (apply), the model card (card) and what a source license asks (licenses).
Imports no torch."""
