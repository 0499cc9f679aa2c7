"""Everything that runs training: data, models, losses, the train loop, the dispatcher."""
