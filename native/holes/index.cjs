'use strict'
// The compiled addon; require() throws where it was not built, and vmapipe then reads holes as data.
module.exports = require('./build/Release/holes.node')
