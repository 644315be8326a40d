"""Evaluation: the reference speculative decoder, its metrics, tasks, cells and the report.

Layering (lowest first): errors, config <- util <- data <- models <- training <- evaluation
<- workers <- pipelines <- cli/api. Modules here may import draftalign.errors,
draftalign.config, draftalign.util, draftalign.data, draftalign.models, draftalign.training
and each other; not workers, pipelines, cluster, cli or api. No re-exports: import from the
module (`from draftalign.evaluation.metrics import block_efficiency`).
"""
