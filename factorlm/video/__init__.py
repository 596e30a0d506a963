"""Video prediction with ConvLSTMs on moving digits: ``factorlm video`` (factorlm.video.cli).

    config.py   VideoConfig, the run's settings
    model.py    VideoPredictor (encoder conv → ConvLSTM → decoder conv) and its counts
    metrics.py  per-frame MSE, MAE and SSIM
    run.py      the training run: budgets, checkpoints and resume, evaluation, the PNG strip
    cli.py      the command's options
"""
