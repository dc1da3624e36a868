from fleetwise.cli import app

app()
