#!/usr/bin/env node
import { runCommand } from '../lib/cli/main.js'
import { pack } from '../lib/cli/create.js'

const code = await runCommand(pack, process.argv.slice(2), 'pack-vma')
process.stdout.write('', () => process.exit(code))
