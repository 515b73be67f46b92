"""Evaluation of the trained models (``alignment.evaluation``): the score stage (``evaluate``: held-out
answers of each model scored by every reward model, with gold accuracy, ROUGE and the KL to the
reference), the pairwise LLM judge (``judge``), the gold checks of free-form answers (``gold``), the
interval statistics and tests every comparison uses (``stats``), the degenerate-answer check
(``degenerate``), the verdict that reads them together (``verdict``) and the online runs'
over-optimisation alarm over their held-out evaluations (``alarm``)."""
