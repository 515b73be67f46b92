"""Prefect flows composing the stage tasks: ``alignment-pipeline`` and one flow per stage."""
