"""Local parts for the demo, the benchmarks and the tests: the Datastore emulators (started on a
free loopback port, never outliving their starter), sessions shaped as the runner writes them,
and a loopback proxy that delays or cuts connections. Nothing here runs in a sweep.
"""
