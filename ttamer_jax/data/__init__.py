"""Layer 2, data: traces and what turns them into models and files.

The traces container (:mod:`.traces`), the checksummed archive format
(:mod:`.archive`, :mod:`.files`), tables (:mod:`.tables`, pandas on use),
discretisers and deployed policies (:mod:`.discretise`), fitting
(:mod:`.fitting`), cascade and policy files (:mod:`.cascade_io`,
:mod:`.policy_io`) and synthetic generators (:mod:`.synthetic`). Imports only
from ``core``.

The layer's supported names are in ``__all__`` (the most used are also in
``ttamer_jax.__all__``); other module-level names are internal.
"""

from ttamer_jax.data.answers import AnswerModel, fit_answer_model
from ttamer_jax.data.cascade_io import CASCADE_FORMAT_VERSION, load_cascade, save_cascade
from ttamer_jax.data.discretise import DeployedPolicy, Discretiser, trace_scores
from ttamer_jax.data.fitting import (
                                     FittedCascade,
                                     FittedGraph,
                                     fit_cascade,
                                     fit_cascade_from_states,
                                     fit_discretiser,
                                     fit_skip_line,
                                     traces_with_states,
)
from ttamer_jax.data.policy_io import POLICY_FORMAT_VERSION, load_policy, save_policy
from ttamer_jax.data.synthetic import (
                                     TraceWorkload,
                                     overthinking_cascade,
                                     sample_traces,
                                     synthetic_cascade,
                                     synthetic_workload,
                                     workload_traces,
)
from ttamer_jax.data.tables import load_traces_table, read_traces, traces_from_table, traces_to_table
from ttamer_jax.data.traces import TRACES_FORMAT_VERSION, ExitTraces, load_traces, save_traces, split_traces

__all__ = [
    "AnswerModel", "fit_answer_model", "CASCADE_FORMAT_VERSION", "load_cascade", "save_cascade",
    "DeployedPolicy", "Discretiser", "trace_scores", "FittedCascade", "FittedGraph", "fit_cascade",
    "fit_cascade_from_states", "fit_discretiser", "fit_skip_line", "traces_with_states",
    "POLICY_FORMAT_VERSION", "load_policy", "save_policy", "TraceWorkload", "overthinking_cascade",
    "sample_traces", "synthetic_cascade", "synthetic_workload", "workload_traces",
    "load_traces_table", "read_traces", "traces_from_table", "traces_to_table",
    "TRACES_FORMAT_VERSION", "ExitTraces", "load_traces", "save_traces", "split_traces",
]
