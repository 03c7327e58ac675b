"""The training engine: the loop (trainer), checkpoints, metrics, schedules, devices, the model store,
the teacher-output cache and data-parallel helpers. It knows stages and losses only through the
Stage protocol (kdrun.engine.trainer.Stage): no scheme and no knowledge term is named here."""
