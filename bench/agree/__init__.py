"""Does the simulator agree with the real thing? The same trace slice through `fleetwise up`
(real workers and router) and through the simulator timed by the worker's own measured steps."""
