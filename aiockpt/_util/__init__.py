"""Small helpers every layer may use: console output, human units, and the bridge that
lets one coroutine body serve both async and blocking front-ends."""
