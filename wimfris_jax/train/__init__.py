"""Training machinery for every model family on a JAX device mesh (the recipes: WIMFRIS Sec. 4.1 / DETRIS, and the
peers' AdamW variants, :mod:`.optim`).

  state       TrainState, create_train_state, init_train_state (sharded init), abstract_state
  optim       Adam + step-decay schedule (make_optimizer, lr_schedule)
  sharding    mesh, replicated / FSDP shardings, shard_batch, maybe_initialize_distributed
  step        make_train_step (loss, grads of the trainable split, bf16 option), jit_train_step
  checkpoint  Checkpoints: orbax last-N + best-by-metric, with the grain iterator position (the writer; reading
              a run is wimfris_jax.checkpoints, below this package)
  workdir     hold_workdir: one writer per run (the workdir's lock); failed disk writes in one line
  signals     StopSignals, TrainingInterrupted: Ctrl-C / SIGTERM end the step, save and stop
  logging     MetricWriter: metrics.jsonl + TensorBoard
  loop        train(config, workdir, ...): everything above, with tqdm, eval, resume and Ctrl-C / SIGTERM

Submodules are imported explicitly (``from wimfris_jax.train.loop import train``) to keep this import light.
"""
