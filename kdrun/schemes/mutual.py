"""Deep mutual learning (Zhang et al., CVPR 2018): peers train at once and teach each other.

Every peer i learns from labels and from every other peer j through the selected terms (cfg.loss),
with j's outputs detached (a peer's target never passes gradient to that peer), averaged over the
K - 1 others. With loss=kd this is DML's KL (DML itself: loss.kd.temperature=1, loss.kd.alpha=0.5,
which is DML's CE + KL up to a factor of 2). Peers of the same architecture start from different
initialisations (seed + k).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from kdrun.config import model_node, split_models
from kdrun.errors import ConfigError
from kdrun.knowledge import KnowledgeSet, Step
from kdrun.schemes.base import Scheme
from kdrun.schemes.stages import (
    SupervisedStage,
    detached,
    log_mean_softmax,
    tapped_forward,
)


class PeerGroup(nn.Module):
    """The peers as one model: ``forward`` gives each peer's logits and their ensemble."""

    def __init__(self, peers: list[nn.Module]) -> None:
        super().__init__()
        self.peers = nn.ModuleList(peers)
        self.names = [f"peer{k}" for k in range(1, len(peers) + 1)]
        self.arch = "peers:" + "+".join(p.arch for p in peers)
        self.num_classes, self.in_chans = peers[0].num_classes, peers[0].in_chans

    def forward(self, x: torch.Tensor) -> dict:
        out = {name: peer(x) for name, peer in zip(self.names, self.peers)}
        out["ensemble"] = log_mean_softmax(list(out.values()))
        return out


class MutualStage(SupervisedStage):
    def __init__(self, group: PeerGroup, edges: dict[tuple[int, int], KnowledgeSet]) -> None:
        super().__init__(group, "mutual")
        self.primary = group.names[0]
        self.edges = nn.ModuleDict({f"{i}_{j}": s for (i, j), s in edges.items()})
        k = len(group.peers)
        self.taps = [set().union({"logits"}, *(s.student_taps() for (i, _), s in edges.items() if i == p),
                                 *(s.teacher_taps() for (_, j), s in edges.items() if j == p)) for p in range(k)]

    def parameters_to_train(self):
        return super().parameters_to_train() + [p for p in self.edges.parameters() if p.requires_grad]

    def train(self) -> None:
        self.model.train()
        self.edges.train()

    def training_step(self, x: torch.Tensor, step: Step):
        peers = self.model.peers
        outs = [tapped_forward(peer, x, taps) for peer, taps in zip(peers, self.taps)]
        targets = [detached(o) for o in outs]
        k = len(peers)
        total = 0.0
        logs: dict = {}
        for key, kset in self.edges.items():
            i, j = (int(v) for v in key.split("_"))
            loss, edge_logs = kset(outs[i], targets[j], step)
            total = total + loss / (k - 1)
            for name, v in edge_logs.items():
                logs[name] = logs.get(name, 0.0) + v / (k - 1)
        return total, {n: o["logits"] for n, o in zip(self.model.names, outs)}, logs

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"edges": self.edges}


class Mutual(Scheme):
    name = "mutual"
    has_teacher = False
    model_list_keys = ("peers",)
    report_rows = (("peer{k}_top1_best", "peer {k}", "peer{k}"), ("peers_ensemble_top1_best", "peers' ensemble", None))

    @classmethod
    def models_label(cls, cfg) -> str:
        return "+".join(cls.model_list(cfg, "peers")) or "peers"

    def validate(self, cfg) -> None:
        if len(split_models(cfg.get("peers"))) < 2:
            raise ConfigError("scheme=mutual needs two or more peers: peers=[resnet32,resnet32]")
        if not cfg.loss:
            raise ConfigError("scheme=mutual needs knowledge terms for the peers to exchange, e.g. loss=kd")

    def run(self, ctx) -> dict:
        cfg = ctx.cfg
        self.validate(cfg)
        names = split_models(cfg.peers)
        nodes = [model_node(n) for n in names]
        seed = int(cfg.seed)
        peers = [ctx.models.build(node, seed + k) for k, node in enumerate(nodes)]
        edges = {(i, j): ctx.distiller.new_knowledge(peers[i], peers[j])
                 for i in range(len(peers)) for j in range(len(peers)) if i != j}
        group = PeerGroup(peers)
        lr = {ctx.models.lr_for(node) for node in nodes}
        if len(lr) > 1:
            raise ConfigError(f"peers {'+'.join(names)} have different model learning rates {sorted(lr)}; "
                              "set optim.lr and the peers' lr to one value")
        fit = ctx.distiller.fit(MutualStage(group, edges), nodes[0])
        out: dict = {"peers": "+".join(names)}
        for k, (name, peer) in enumerate(zip(names, peers), start=1):
            res = fit.models[f"peer{k}"]
            out.update({f"peer{k}": name, f"peer{k}_top1_best": res.top1_best, f"peer{k}_top1_last": res.top1_last,
                        f"peer{k}_params": ctx.models.stats(peer, "p")["p_params"]})
        ens = fit.models["ensemble"]
        out.update({"peers_ensemble_top1_best": ens.top1_best, "peers_ensemble_top1_last": ens.top1_last})
        out.update(fit.as_summary("student"))  # the first peer
        out.update(ctx.models.stats(peers[0], "student"))
        out["student"] = names[0]
        return out
