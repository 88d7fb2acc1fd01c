import models.pruning
def test_x(): pass
