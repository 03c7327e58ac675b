"""Knowledge terms (one small class each) and the set that combines them.

The term library needs neither Hydra nor omegaconf: a term is an ``nn.Module`` built from plain
arguments (``KD(alpha=0.9, temperature=4)``); :func:`kdrun.config.build_knowledge` builds them from
the ``loss`` config.
"""

from kdrun.knowledge.base import KnowledgeSet, KnowledgeTerm, Step

__all__ = ["KnowledgeSet", "KnowledgeTerm", "Step"]
