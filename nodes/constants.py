"""The names the pack's nodes share: their menu category, the types that flow between them, their logger."""
CATEGORY = "concept_em"
STATE = "CONCEPT_EM_STATE"  # a ConceptRun (nodes/run_value.py)
MODEL = "CONCEPT_EM_MODEL"  # the engine's ModelBundle
LOGGER = "concept_em"  # the nodes' logger: ComfyUI's log (its console and log file), line by line
