"""The article's worked example: T=3, 2 features, 3 hidden units, binary
classification through a logistic output on the last hidden state, plain
gradient descent over lstm.params / lstm.grads with learning rate 0.01."""
import numpy as np

from fastlstm.tasks import train_article


def test_article_example_learns():
    r = train_article(steps=3000, lr=0.01)
    losses = r["losses"]
    assert losses[-1] < 0.7 * losses[0]
    assert all(b <= a + 1e-12 for a, b in zip(losses[::100], losses[100::100]))  # falls steadily
    assert r["accuracy"] == 1.0


def test_article_fast_path_tracks_reference():
    fast = train_article(steps=200, backend="fastlstm")
    ref = train_article(steps=200, backend="reference")
    np.testing.assert_allclose(fast["losses"], ref["losses"], rtol=1e-10)
