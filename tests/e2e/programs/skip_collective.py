"""The last rank stops calling collectives: the others time out with a clear error."""
import time

import numpy as np

import distsgd
from distsgd.distribute import MPIStrategy
from distsgd.optimizers import SGD

strategy = MPIStrategy(abort_on_exception=False)
with strategy.scope():
    var = distsgd.Variable(np.zeros(3), name="w")
    opt = SGD(0.1)
    opt.apply_gradients([(np.ones(3), var)])
    if strategy.rank == strategy.num_replicas_in_sync - 1:
        time.sleep(30)
    else:
        try:
            opt.apply_gradients([(np.ones(3), var)])
        except Exception as error:
            print(f"rank {strategy.rank} caught {type(error).__name__}: {error}", flush=True)
            strategy.communicator.abort(3)
