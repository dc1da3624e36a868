"""The admin REST API and its store: see the fleet, act on it through `FleetActions`, and
keep an audit of every action."""
