import actcache
def test_x(): pass
