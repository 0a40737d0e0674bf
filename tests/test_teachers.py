"""Teachers: kinds, capabilities checked against methods when a config loads, the `hf` teacher."""

from __future__ import annotations

import pytest
import torch

from distilgen.config import ConfigError, DistillConfig, GenerateConfig, TeacherConfig, from_dict
from distilgen.distill import check_method
from distilgen.teachers import CAPABILITIES, TEACHER_KINDS, TeacherKind, load_teacher
from distilgen.teachers.hf import teacher_fingerprint

DATA = {"task": {"train_size": 8, "unlabeled_size": 0, "dev_size": 0, "test_size": 0}}


@pytest.fixture
def kinds(monkeypatch):
    """Two kinds that cannot run a model here, as an API teacher could not: text only, and text with top-k."""
    monkeypatch.setitem(TEACHER_KINDS, "text", TeacherKind(frozenset({"text"}), "nowhere"))
    monkeypatch.setitem(TEACHER_KINDS, "topk", TeacherKind(frozenset({"text", "topk"}), "nowhere"))


def _distill(teacher_dir, kind: str, method: str, **pts) -> DistillConfig:
    teacher = {"path": str(teacher_dir), "kind": kind}
    student = {"arch": "bart", "hidden_size": 16, "num_heads": 2}
    data = {"output_dir": "x", "data": DATA, "teacher": teacher, "student": student, "method": method, "pts": pts}
    cfg = from_dict(DistillConfig, data)
    check_method(cfg)  # as `distill` does first
    return cfg


def test_an_hf_teacher_is_a_text_model_with_a_kind_capabilities_and_a_fingerprint(teacher_dir):
    teacher = load_teacher(TeacherConfig(path=str(teacher_dir)), "fp32", torch.device("cpu"))
    assert teacher.kind == "hf" and teacher.capabilities == frozenset(CAPABILITIES)
    assert teacher.fingerprint(256) == teacher_fingerprint(teacher, 256) != teacher.fingerprint(128)
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())


def test_a_method_the_teacher_cannot_serve_is_refused_naming_the_ones_that_work(teacher_dir, kinds):
    with pytest.raises(ConfigError, match=r"teacher.kind: method 'joint_teaching' needs a teacher that gives full "
                       r"next-token distributions.*choose one of: finetune, seq_kd$"):  # fmt: skip
        _distill(teacher_dir, "text", "joint_teaching")
    _distill(teacher_dir, "text", "seq_kd")


def test_logits_kd_on_pts_needs_only_stored_topk_when_every_target_is_a_pt(teacher_dir, kinds):
    with pytest.raises(ConfigError, match="method 'logits_kd_pt' needs .*full next-token"):
        _distill(teacher_dir, "topk", "logits_kd_pt", topk=20)  # the gold targets need a live teacher
    _distill(teacher_dir, "topk", "logits_kd_pt", topk=20, include_gold=False)
    for method in ("logits_kd", "joint_teaching", "student_pt"):
        with pytest.raises(ConfigError, match=f"method '{method}' needs"):
            _distill(teacher_dir, "topk", method, topk=20, include_gold=False)


def test_generating_top_k_needs_a_teacher_that_gives_it_and_an_unknown_kind_lists_the_kinds(teacher_dir, kinds):
    cfg = {"store": "pts", "data": DATA, "teacher": {"path": str(teacher_dir), "kind": "text"}}
    from_dict(GenerateConfig, cfg)
    with pytest.raises(ConfigError, match="teacher.kind: generate needs a teacher that gives the top-k"):
        from_dict(GenerateConfig, {**cfg, "topk": 5})
    with pytest.raises(ConfigError, match="teacher.kind: unknown teacher kind 'vllm'; one of: hf, api, text, topk"):
        from_dict(GenerateConfig, {**cfg, "teacher": {"path": str(teacher_dir), "kind": "vllm"}})
