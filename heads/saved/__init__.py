"""Kept models: a run's weights beside the results database, model folders (`iqa export`), and the model
class that loads them and scores images (`iqa.load_model`, `iqa score`)."""
