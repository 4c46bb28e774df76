"""Small helpers every layer may use: console output, human units, values in messages,
statistics, logging setup, and the bridge that lets one coroutine body serve both async and
blocking front-ends."""
