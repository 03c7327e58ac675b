"""Knowledge terms (one small class each) and the set that combines them."""

from kdrun.knowledge.base import KnowledgeSet, KnowledgeTerm, Step

__all__ = ["KnowledgeSet", "KnowledgeTerm", "Step", "build_knowledge"]


def build_knowledge(loss_cfg, ce_weight="auto") -> KnowledgeSet:
    """Instantiate every term of ``cfg.loss`` (one `_target_` node per term) into a KnowledgeSet
    whose label cross-entropy weight is ``ce_weight`` (the root config's ``ce_weight``)."""
    from kdrun.config import instantiate
    from kdrun.errors import ConfigError

    terms = {}
    for name, node in (loss_cfg or {}).items():
        if node is None or "_target_" not in node:
            raise ConfigError(f"loss.{name} has no _target_; is conf/loss/{name}.yaml missing '# @package loss.{name}'?")
        terms[name] = instantiate(node)
    return KnowledgeSet(terms, ce_weight)
