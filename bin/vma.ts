#!/usr/bin/env node
import { main } from '../lib/cli/main.js'

const code = await main(process.argv.slice(2))
// Exit explicitly once stdout is flushed: a half-read stdin or a killed helper must not keep us alive.
process.stdout.write('', () => process.exit(code))
