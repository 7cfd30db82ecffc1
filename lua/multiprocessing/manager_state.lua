-- multiprocessing.manager_state: what a manager's client side
-- (managers.lua, manager_proxies.lua) and its server side
-- (manager_server.lua) share in one process -- the servers this process
-- runs (uid -> Server), the client a reply is being encoded for, and the
-- metatable of the server's object records.  Data only; both sides
-- require it, neither requires the other for it.
local S = {}

S.serving = {}
S.reply_to = nil
local REC_MT = {__name = "multiprocessing.ManagedObject"}
REC_MT.__tostring = function(rec)
  return string.format("<managed %s #%d>", rec.typeid, rec.id)
end
S.REC_MT = REC_MT

return S
