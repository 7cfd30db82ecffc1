-- multiprocessing.sharedctypes: Value, Array, RawValue, RawArray.
--
-- The objects and their constructors are C (runtime/value.c):
-- Value(typecode, init, {lock = true|false|lockobj}) or one options table
-- Value{typecode =, value =, lock =}; Array(typecode, size_or_sequence,
-- opts) or Array{typecode =, size = | init =, lock =}.  This file adds
-- the scoped forms (v:with(fn), v:guard()) that use the object's lock.
local core = require "multiprocessing.core"
local sync = require "multiprocessing.synchronize"

sync._scoped {"Value", "Array"}

return {
  Value = core.Value,
  Array = core.Array,
  RawValue = core.RawValue,
  RawArray = core.RawArray,
}
