"""The classifier: data, preprocessing, model, training, evaluation and the serving interface.

Nothing in this package knows about HTTP or the database; the web app uses `Classifier`.
"""
