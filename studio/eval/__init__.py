"""Evaluation: ``studio bench`` (:mod:`studio.eval.bench`), its DeepInverse peers
(:mod:`studio.eval.deepinv_peer`), ``studio bench-inversion`` (:mod:`studio.eval.inversion_bench`),
``studio edit-strip`` (:mod:`studio.eval.edit_strip`) and ``studio personalize-eval``
(:mod:`studio.eval.personalize_eval`)."""

# Peer modules register their solver names with the bench (studio.eval.bench.peers) where they are
# defined; importing them here makes the registry complete whenever anything in studio.eval is used.
from studio.eval import deepinv_peer  # noqa: F401
