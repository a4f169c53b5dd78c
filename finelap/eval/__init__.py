"""Evaluation: `finelap eval` (see finelap/eval/cli.py) and what it is made of.

Each module imports only those listed above it:

    config.py        EvalConfig, EvalTaskConfig, load_eval_config, prompt_for: the eval config
    readers.py       read_retrieval, read_labels, read_sed_ground_truth, read_grounding, ...: the
                     evaluation files, bad records named by file:line (EvalDataError, BadInputPolicy)
    report.py        TaskReport, write_report: metrics.json, report.md and the evaluation plots
    embedding.py     TaskContext, embed_and_collect: a task's audio embedded batch by batch
    retrieval.py     run_retrieval
    zero_shot.py     run_zero_shot
    sed.py           run_sed; score_sed, which scores a model's frame scores and saved ones alike
    grounding.py     run_grounding; score_grounding, likewise
    tasks.py         RUNNERS (task type -> runner) and evaluate(model_dir, config, out_dir)
    saved_scores.py  evaluate_sed_scores, evaluate_grounding_scores: `finelap eval sed|grounding --scores`
    cli.py           main(argv): `finelap eval`, also run by `python -m finelap.eval`

Metric definitions live in finelap.metrics, which never sees a model.
"""
