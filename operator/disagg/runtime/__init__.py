"""The operator's runtime: the work queue, the children's informers, the autoscaler's loop and the
resync, each a module of its own, wired by one composition root (`operator.Operator`) under kopf's
thin layer (`handlers`, the only module that imports kopf)."""
